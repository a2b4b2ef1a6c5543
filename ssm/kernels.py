"""Pure functions mapping SSM parameters to convolution kernels K (H, L).

No function here owns a parameter; layers in ``ssm.layers`` call these.
"""

from __future__ import annotations

# ---- S4 (DPLR) and S4D (diagonal) kernels: dplr_kernel, diag_kernel ----

# ---- RTF (rational transfer function) kernel: rtf_kernel ----
