"""vaerepro: a reproduction harness for variational auto-encoders."""

# registered first, so that at exit it runs after every library's atexit handler (vaerepro.quick_exit)
from vaerepro import quick_exit as _quick_exit  # noqa: F401

__version__ = "0.1.0"
