"""The one map between dtype names (as configs, layouts and saved files spell them) and torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
