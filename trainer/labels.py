"""The label conventions shared by the data side and the model side (neither imports the other)."""

#: The label of a position that takes no loss (padding, prompts, filler rows): the one definition.
IGNORE_INDEX = -100
