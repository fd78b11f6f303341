"""One continual-learning run: prepare -> plan -> execute -> record (see the submodules)."""
