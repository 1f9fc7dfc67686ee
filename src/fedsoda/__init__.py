"""fedsoda: resource-efficient federated fine-tuning of large language models."""

import logging

# bitsandbytes tries to fetch an optional CPU inference kernel from the Hugging Face hub at
# import and warns when it cannot. fedsoda never uses that kernel (it keeps 4-bit weights in
# the trainable layout, see surgery/quantize.py), so the warning is only noise offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
