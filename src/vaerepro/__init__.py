"""vaerepro: a reproduction harness for variational auto-encoders."""

__version__ = "0.1.0"
