"""What one rank of an attention case holds, estimated before anything is allocated, and the
other up-front limits of a run (timed repeats), so a case that cannot finish is refused at once.
"""
from __future__ import annotations

# a timed repeat is a whole case: a huge count is a typo or a run that never ends
MAX_REPEATS = 1000
