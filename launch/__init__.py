"""`python -m launch.X` (and `import launch.X`) in a checkout: the module ultrathink_jax/commands/X.py itself, the
code the installed `ultrathink` command runs. launch/ holds no copy: an import finder maps each `launch.X` onto
`ultrathink_jax.commands.X` (the same module object), and `-m` runs that file as __main__."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

TARGET = "ultrathink_jax.commands"


class _Commands(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        target = importlib.util.find_spec(f"{TARGET}.{name}") if parent == __name__ else None
        if target is None:
            return None
        # origin: runpy makes it sys.argv[0] and __file__ of `python -m launch.X`
        return importlib.util.spec_from_loader(fullname, self, origin=target.origin)

    def create_module(self, spec):
        return importlib.import_module(f"{TARGET}.{spec.name.rpartition('.')[2]}")

    def exec_module(self, module):  # already executed as ultrathink_jax.commands.X
        pass

    def get_code(self, fullname):  # runpy (`python -m launch.X`) runs the command's own file as __main__
        target = f"{TARGET}.{fullname.rpartition('.')[2]}"
        # the file's own loader from the path, not find_spec: once launch.X is imported, the shared module's
        # __spec__ is launch.X's, whose loader is this one
        commands = importlib.import_module(TARGET)
        return importlib.machinery.PathFinder.find_spec(target, commands.__path__).loader.get_code(target)


if not any(isinstance(f, _Commands) for f in sys.meta_path):
    sys.meta_path.insert(0, _Commands())
