"""``python -m flower_app.centralized``: the centralized baseline (as ``fl-centralized``)."""

from flower_app.centralized.baseline import main

if __name__ == "__main__":
    main()
