"""Every registered method; importing this package registers them all."""
from . import hiprune, mctf, random_drop, random_select, tome, zero_tprune  # noqa: F401  (registration side effect)
