"""The flash-sale demo (``flashcrowd demo``): the seed story end to end on embedded defaults."""
