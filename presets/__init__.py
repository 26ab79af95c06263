"""Preset YAML files shipped with ft-desk (data only; see trainer/presets.py for how they are read)."""
