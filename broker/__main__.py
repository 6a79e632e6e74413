"""`python -m broker` is the `tasklease` command."""

from broker.cli import main

if __name__ == "__main__":
    main()
