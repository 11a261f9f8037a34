"""The shipped digits demo teacher: its VQ (`digits_vq`) and GPT (`digits_teacher`) training on
scikit-learn's digits, run by `python -m ddjax.main --config=configs/digits.py:MODE`."""
