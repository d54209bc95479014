"""The size configs shipped with the package: `--config=tiny` (or `configs/tiny.py`
from a clone). Each file's `get_config()` returns the ConfigDict of one size."""
