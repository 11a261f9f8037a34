"""DD2 (conditional score distillation, ../shared/dd2.md): work in progress on this branch."""
