"""One module per federated fine-tuning method, each stating its recipe top to bottom."""

import importlib
from types import ModuleType

from fedsoda.methods import fedbiot, fedot, fedpetuning, fedsoda
from fedsoda.methods.hier_settings import VARIANTS
from fedsoda.methods.recipe import Recipe

RECIPES: dict[str, Recipe] = {m.RECIPE.name: m.RECIPE for m in (fedpetuning, fedot, fedbiot, fedsoda)}

# Every method by name, in the order of the FedSODA paper's tables (baselines, then FedSODA).
# Not every method has a Recipe: code that needs one looks it up in RECIPES.
ORDER: tuple[str, ...] = ("fedpetuning", "fedot", "fedbiot", "fedsoda", "fedra", "fedlora_exclusive",
                          "fedpruner", "hierfedlora")
# Display titles: each recipe module's TITLE (a method's module is named after it); methods
# whose module loads torch are titled here, so that this registry stays light for the CLI.
TITLES: dict[str, str] = {**{m.__name__.rsplit(".", 1)[-1]: m.TITLE
                             for m in (fedpetuning, fedot, fedbiot, fedsoda)},
                          "fedra": "FedRA", "fedlora_exclusive": "FedLoRA-exclusive",
                          "fedpruner": "FedPruner", "hierfedlora": "HierFedLoRA",
                          # a table row, not a method: FedPruner with granularity = "block"
                          "fedpruner_plus": "FedPruner+",
                          # rows, not methods: HierFedLoRA's baselines and ablations
                          **VARIANTS}

# Methods whose clients are sized by memory budgets ([fedpruner] budgets, fedsoda.budgets).
BUDGETED: tuple[str, ...] = ("fedpruner", "fedlora_exclusive")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def get_method(name: str) -> ModuleType:
    """The module that runs ``name`` on the federated runtime: ``offsite`` for the recipe
    methods, the method's own module otherwise. Each has the same functions (see
    ``fedsoda.methods.offsite``)."""
    # Imported on demand: runtime modules load torch and transformers.
    if name in RECIPES:
        return importlib.import_module("fedsoda.methods.offsite")
    if name in ORDER:
        return importlib.import_module(f"fedsoda.methods.{name}")
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(ORDER)}")
