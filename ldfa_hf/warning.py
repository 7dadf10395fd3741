"""``LDFAWarning``: its own module, so that every part of the package can warn without importing another."""


class LDFAWarning(UserWarning):
    """Everything ``ldfa_hf`` warns about (filter it with ``warnings.simplefilter(..., LDFAWarning)``)."""
