"""The screens of the ft-desk app: Home plus one per wizard step (Model, Data, Recipe, Train, Evaluate, Export)."""
