"""PRC resident identity numbers (GB 11643-1999): 6-digit region, birth date, sequence, check.

The 17th character's parity is the holder's sex (odd male, even female); the 18th is
the ISO 7064 MOD 11-2 check character.
"""

import numpy as np

_WEIGHTS = np.array([pow(2, 17 - i, 11) for i in range(17)], dtype=np.int64)
_CHECK_CHARS = "10X98765432"


def check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of the first 17 digits."""
    if len(first17) != 17 or not first17.isdigit():
        raise ValueError("need exactly 17 digits")
    total = sum(int(d) * int(w) for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def check_characters(first17: np.ndarray) -> np.ndarray:
    """Vectorized check characters of an array of 17-digit strings."""
    raw = np.frombuffer("".join(first17.tolist()).encode("ascii"), dtype=np.uint8)
    digits = (raw.reshape(-1, 17) - ord("0")).astype(np.int64)
    index = (digits @ _WEIGHTS) % 11
    return np.array(list(_CHECK_CHARS))[index]


def is_valid(national_id: str) -> bool:
    """True when the format and the check character are right (dates are not checked)."""
    return (
        len(national_id) == 18
        and national_id[:17].isdigit()
        and check_character(national_id[:17]) == national_id[17]
    )
