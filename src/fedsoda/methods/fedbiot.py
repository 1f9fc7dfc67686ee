"""FedBiOT: bi-level offsite-tuning (FedSODA paper, section 6.1.3, baseline 3).

Recipe:
- adapter: the last ``L_A`` layers (paper: three), as FedSODA;
- emulator compression: as FedOT (uniform layer dropping, bf16), LoRA on every kept emulator
  layer, pre-aligned on public data;
- the server realigns the emulator after every round and sends the emulator LoRA to every
  client it samples, every round;
- sent per round: the adapter LoRA down and up, plus the emulator LoRA down.
"""

from fedsoda.methods.recipe import Recipe

TITLE = "FedBiOT"
RECIPE = Recipe(name="fedbiot", pruning="uniform", first_adapter_layers=0, quantization="bf16",
                emulator_lora="all", pre_align=True, realign="every_round")
