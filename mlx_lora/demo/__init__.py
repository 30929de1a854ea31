"""The built-in demo: a date-normalisation task SmolLM2-135M cannot do out of the box but learns quickly."""
