"""The bundled tiny model zoo: synthetic tasks, training and the build command."""
