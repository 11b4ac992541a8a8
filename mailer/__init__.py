"""mailer: turn one open letter into thousands of personal appeals, and keep an exact record."""

__version__ = "0.1.0"
