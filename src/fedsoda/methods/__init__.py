"""One module per federated fine-tuning method, each stating its recipe top to bottom."""

from fedsoda.methods import fedbiot, fedot, fedpetuning, fedsoda
from fedsoda.methods.recipe import Recipe

RECIPES: dict[str, Recipe] = {m.RECIPE.name: m.RECIPE for m in (fedpetuning, fedot, fedbiot, fedsoda)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]
