import pytest

# Assertions in the shared helpers report like those in the tests themselves.
pytest.register_assert_rewrite("tests.helpers")
