"""Built-in methods, installed as the `benchsuite_plugins` package and registered through the
`benchsuite` entry-point group exactly as a third-party method is."""
