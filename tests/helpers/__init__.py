"""What several test modules share, imported by name (``from tests.helpers.cli import run_cli``).

Test modules never import one another: a helper two of them need lives here, and a shared set-up
is a fixture in ``tests/conftest.py``.
"""
