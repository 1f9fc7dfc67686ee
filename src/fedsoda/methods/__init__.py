"""One module per federated fine-tuning method, each stating its recipe top to bottom."""

from fedsoda.methods import fedbiot, fedot, fedpetuning, fedsoda
from fedsoda.methods.recipe import Recipe

RECIPES: dict[str, Recipe] = {m.RECIPE.name: m.RECIPE for m in (fedpetuning, fedot, fedbiot, fedsoda)}

# Every method by name, in the order of the FedSODA paper's tables (baselines, then FedSODA).
# Not every method has a Recipe: code that needs one looks it up in RECIPES.
ORDER: tuple[str, ...] = ("fedpetuning", "fedot", "fedbiot", "fedsoda")
# Display titles from each module's TITLE (a method's module is named after it).
TITLES: dict[str, str] = {m.__name__.rsplit(".", 1)[-1]: m.TITLE
                          for m in (fedpetuning, fedot, fedbiot, fedsoda)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]
