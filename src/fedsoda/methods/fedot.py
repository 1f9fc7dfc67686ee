"""FedOT: Offsite-tuning in federated learning (FedSODA paper, section 6.1.3, baseline 2).

Recipe:
- adapter: the first layer and the last ``L_A - 1`` layers (paper: first one, last two);
- emulator compression: uniform layer dropping of the same ``p`` windows of ``n`` layers as
  FedSODA prunes, spread evenly instead of chosen by similarity (``uniform_groups``; blocks,
  where Offsite-tuning drops single layers), kept in 16-bit (bf16);
- emulator LoRA on every kept emulator layer, distilled once on public data before training
  (same losses and settings as FedSODA's pre-alignment); never realigned;
- sent per round: the adapter LoRA down and up; the sub-model and its emulator LoRA once.
"""

from fedsoda.methods.recipe import Recipe

TITLE = "FedOT"
RECIPE = Recipe(name="fedot", pruning="uniform", first_adapter_layers=1, quantization="bf16",
                emulator_lora="all", pre_align=True, realign="never")
