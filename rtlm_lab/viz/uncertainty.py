"""Moved: the uncertainty figures are :mod:`rtlm_lab.uncertainty.figures` (and
:func:`rtlm_lab.uncertainty.modelside.plot_model_vs_input`), the figure kit is :mod:`rtlm_lab.viz.common`.

``viz`` is the lowest of the analysis layers, so its modules may not import :mod:`rtlm_lab.uncertainty`. This
module keeps the two names :mod:`rtlm_lab.scheduler.study` imports from here (``_plt``, ``save_figure``) until
that module imports :mod:`rtlm_lab.viz.common` itself.
"""

from rtlm_lab.viz.common import pyplot as _plt  # noqa: F401
from rtlm_lab.viz.common import save_figure  # noqa: F401
