"""FedPETuning: LoRA fine-tuning of the full LLM (FedSODA paper, section 6.1.3, baseline 1).

Recipe:
- adapter: every layer of the full model (LoRA r=8, alpha=16 on the same projections);
- emulator: none; no pruning, no quantization (clients hold the whole model in bf16);
- alignment: none;
- sent per round: the LoRA of every layer, down and up; the full model once per client.
"""

from fedsoda.methods.recipe import Recipe

TITLE = "FedPETuning"
RECIPE = Recipe(name="fedpetuning", pruning="none", first_adapter_layers=0, quantization="bf16",
                emulator_lora="none", pre_align=False, realign="never")
