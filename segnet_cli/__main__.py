"""``python -m segnet_cli`` runs the same app as the ``segnet`` console script."""

from segnet_cli.cli import main

if __name__ == "__main__":
    main()
