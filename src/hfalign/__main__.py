"""`python -m hfalign RECIPE [overrides]` trains, so `accelerate launch -m hfalign RECIPE` works."""

from hfalign.cli import main

if __name__ == "__main__":
    main()
