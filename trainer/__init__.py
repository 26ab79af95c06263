"""ft-desk's trainer: everything a run is, with no user interface (never imports textual).

The modules at this level are the contracts the TUI and the rooms share: config, presets, events, errors, paths,
run_folder, chat_format, generation, planning and demo. Each wizard step / command has one room below them:
hub/ (Model), data/ (Data), training/ (Train), evaluate/ (Evaluate), export/ (Export) and cli/ (argparse and
printing). Rooms build on the contracts and on quant/, never on the TUI.
"""
