"""FedSODA (FedSODA paper, Algorithm 2).

Recipe:
- adapter: the last ``L_A`` layers of the full LLM (default 3);
- emulator compression: similarity group pruning (``p`` windows of ``n`` layers), then NF4;
- LoRA r=8, alpha=16 on the kept window starts (emulator LoRA, server-trained) and on every
  adapter layer (adapter LoRA, client-trained);
- before training: pre-alignment, ``E_p`` epochs of distillation on public data;
- each round: clients train the adapter LoRA (task loss + FedProx), the server averages
  them (FedAvg by example count);
- every ``r`` rounds: realignment on a random public subset; the new emulator LoRA goes to
  clients with their next message;
- sent per round: adapter LoRA down and up; emulator LoRA down after a realignment;
  the NF4 sub-LLM once per client.
"""

from fedsoda.methods.recipe import Recipe

TITLE = "FedSODA"
RECIPE = Recipe(name="fedsoda", pruning="sgp", first_adapter_layers=0, quantization="nf4",
                emulator_lora="starts", pre_align=True, realign="every_r")
