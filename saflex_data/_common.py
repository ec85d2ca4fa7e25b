"""Compatibility names (private): what ``_common`` held before it was split into named modules.

``_seeds`` (seeds), ``_describe`` (error-message descriptions), ``_math.as_probabilities`` (labels), ``_hooks`` (weak
hooks), ``_passes`` (SAFLEX's own passes of the model), ``_report`` (the per-step report) and ``_removed`` (the
0.2 removed-argument errors). The adapters still import ``describe``, ``draw_seed`` and ``seeded`` from here, and
models pickled by an earlier version name ``_common._disarmed_hook``; new code imports from the named modules.
"""

from ._describe import describe
from ._hooks import _disarmed, _disarmed_hook
from ._math import as_probabilities
from ._removed import rejects_removed_arguments
from ._seeds import MASK63 as _MASK63
from ._seeds import draw_seed, mix_seed, seeded

__all__ = ["describe", "rejects_removed_arguments", "draw_seed", "mix_seed", "seeded", "as_probabilities", "_disarmed",
           "_disarmed_hook", "_MASK63"]
