"""Teachers: pre-trained image AR models behind one interface (`Teacher`, in `base.py`).

Families, one folder each:
  ddjax.teacher.llamagen   LlamaGen's GPT and VQ tokenizer (`LlamaGenTeacher`)
"""

from ddjax.teacher.base import Teacher, TokenRule

__all__ = ["Teacher", "TokenRule"]
