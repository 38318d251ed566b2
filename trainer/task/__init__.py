"""The bundled synthetic instruction task and its gold judge."""
