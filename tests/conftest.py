"""Root test configuration: shared fixtures live in plugin modules listed here."""

pytest_plugins = [
    "tests.fixtures.s3server",
]
