"""YAML configs of ``transmix-train`` (keys are flag names with underscores); installed as
``transmix_train.configs`` so the default config is found in any install."""
