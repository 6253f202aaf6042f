"""The code a pipeline folder ships, so that plain diffusers loads it without sit-atconv installed:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

diffusers (remote code / custom components) reads model_index.json's `_class_name: [module, class]` as
"the pipeline class is `class` in `<folder>/<module>.py`", and a component entry `[module, class]` as
"`class` in `<folder>/<component>/<module>.py`". Both name CODE_MODULE here, and the two copies of that
file are identical: one generated module holding the pipeline, the SiT and everything they call.

The module is generated from this package's own source at export time (`generate_code`), never kept by
hand: starting from every top-level definition of `sit_atconv.pipelines.pipeline_sit`, it follows the
names each definition uses through the package's imports and copies the definitions they lead to (in
their modules' order, with their comments), drops the intra-package imports, and writes one block of
third-party imports. Names bound to a module (`from sit_atconv import vae as autoencoder`) are
rewritten to the names of the copied definitions (`autoencoder.decode` -> `decode`); an imported name
that clashes with a copied one is qualified (`Path` from pathlib -> `pathlib.Path`). The fused Triton
kernels are left out: `STUBS` replaces `modulated_depthwise_conv` with a function that explains, and the
default `conv_impl="auto"` never calls it.

Annotations of copied functions outside the pipeline module are not followed: the bundle has
`from __future__ import annotations`, so they stay unevaluated strings; the pipeline's own are followed,
since diffusers evaluates `SiTPipeline.__init__`'s annotations to check the components' types.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "sit_atconv"
ENTRY = "sit_atconv.pipelines.pipeline_sit"
CODE_MODULE = "pipeline_sit_atconv"  # <folder>/pipeline_sit_atconv.py and transformer/pipeline_sit_atconv.py
PIPELINE_CLASS = "SiTPipeline"
TRANSFORMER_CLASS = "SiT"

STUBS = {
    ("sit_atconv.ops.atconv_triton", "modulated_depthwise_conv"): '''
def modulated_depthwise_conv(v, k, gamma):
    """Stands in for the fused Triton kernels of sit-atconv, which this file leaves out (conv_impl="auto",
    the default, never calls them)."""
    raise RuntimeError(
        "conv_impl='triton' needs the sit-atconv package; this pipeline folder's code runs the exact torch "
        "forms of ATConv (conv_impl 'auto', 'channels_last' or 'shift')"
    )
''',
}

# Executed at the top and the bottom of the generated module (see `generate_code`).
REEXECUTION_GUARD = """\
# diffusers executes this file twice in one module: for the pipeline class (model_index.json's _class_name)
# and again for the transformer component (transformer/ holds the same file). The second execution keeps
# the first one's objects, so the transformer is an instance of the SiT class the pipeline was declared with.
_FIRST_EXECUTION = dict(globals()) if globals().get("CODE_DIGEST") == "{digest}" else None
CODE_DIGEST = "{digest}"
"""
REEXECUTION_RESTORE = """\
if _FIRST_EXECUTION is not None:
    globals().update(_FIRST_EXECUTION)
"""


class BundleError(RuntimeError):
    """The package's source cannot be assembled into one module (a name clash between two copied
    definitions, an intra-package import inside a function, ...): the message says what to change."""


# ------------------------------------------------------------------------------------------------
# Reading the package
# ------------------------------------------------------------------------------------------------


@dataclass
class Binding:
    """What a top-level import binds a name to: a third-party object ("external", `module` and `attr`
    with attr None for `import module`), a package object ("internal"), or a package module ("module")."""

    kind: str
    module: str
    attr: str | None = None


@dataclass
class Module:
    name: str
    path: Path
    source: str
    tree: ast.Module
    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, Binding] = field(default_factory=dict)

    def __post_init__(self):
        self.lines = self.source.splitlines()


def package_root() -> Path:
    import sit_atconv

    return Path(sit_atconv.__file__).parent


def module_path(name: str) -> Path | None:
    """The source file of package module `name`, or None when it is not one."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_root().joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def read_module(name: str, cache: dict[str, Module]) -> Module:
    if name in cache:
        return cache[name]
    path = module_path(name)
    if path is None:
        raise BundleError(f"{name} is not a module of {PACKAGE}")
    source = path.read_text()
    module = Module(name, path, source, ast.parse(source, str(path)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for stmt in module.tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module.definitions[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        module.definitions[node.id] = stmt
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name.split(".")[0] == PACKAGE:
                    raise BundleError(f"{path}: use `from ... import ...` for package imports ({alias.name})")
                if alias.asname:
                    module.imports[alias.asname] = Binding("external", alias.name)
                else:  # `import a.b` binds `a`
                    top = alias.name.split(".")[0]
                    module.imports[top] = Binding("external", top)
        elif isinstance(stmt, ast.ImportFrom):
            source_module = stmt.module or ""
            if stmt.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - stmt.level + 1]
                source_module = ".".join(base + ([stmt.module] if stmt.module else []))
            if source_module == "__future__":
                continue
            for alias in stmt.names:
                local = alias.asname or alias.name
                if source_module.split(".")[0] != PACKAGE:
                    module.imports[local] = Binding("external", source_module, alias.name)
                elif module_path(f"{source_module}.{alias.name}") is not None:
                    module.imports[local] = Binding("module", f"{source_module}.{alias.name}")
                else:
                    module.imports[local] = Binding("internal", source_module, alias.name)
    cache[name] = module
    return module


# ------------------------------------------------------------------------------------------------
# Following names
# ------------------------------------------------------------------------------------------------


def annotation_nodes(stmt: ast.AST) -> set[int]:
    """ids of every node inside an annotation of `stmt` (arguments, returns, annotated assignments)."""
    inside = set()
    for node in ast.walk(stmt):
        roots = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        for root in roots:
            inside.update(id(n) for n in ast.walk(root))
    return inside


@dataclass
class Use:
    """A name a copied statement uses: `node` (Name, or Attribute on a module alias) in `module`."""

    module: str
    name: str
    node: ast.AST
    in_annotation: bool


def uses(module: Module, stmt: ast.stmt) -> list[Use]:
    """The module-level names `stmt` reads (over-approximated: a local that shadows a module-level name
    counts as a use of it, which only copies a definition too many)."""
    annotations = annotation_nodes(stmt)
    found, aliases = [], set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            binding = module.imports.get(node.value.id)
            if binding is not None and binding.kind == "module":
                found.append(Use(module.name, node.value.id, node, id(node) in annotations))
                aliases.add(id(node.value))
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in aliases:
            binding = module.imports.get(node.id)
            if binding is not None and binding.kind == "module":
                raise BundleError(
                    f"{module.path}:{node.lineno}: the module alias {node.id!r} is used other than as "
                    f"`{node.id}.name`, which the pipeline folder's code cannot express"
                )
            if node.id in module.definitions or binding is not None:
                found.append(Use(module.name, node.id, node, id(node) in annotations))
    return found


def check_nested_imports(module: Module, stmt: ast.stmt) -> None:
    for node in ast.walk(stmt):
        if node is stmt:
            continue
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE):
            raise BundleError(
                f"{module.path}:{node.lineno}: a package import inside a function cannot be bundled into the "
                "pipeline folder's code; import it at the top of the module"
            )
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise BundleError(f"{module.path}:{node.lineno}: a package import inside a function cannot be bundled")


class Bundle:
    """The definitions reachable from ENTRY, with the edits that make them one module."""

    def __init__(self):
        self.modules: dict[str, Module] = {}
        self.included: dict[str, list[ast.stmt]] = {}  # module -> statements, in no particular order yet
        self.stubs: dict[str, str] = {}  # bound name -> stub source
        self.owner: dict[str, tuple] = {}  # bundle-level name -> ("def", module) | ("external", module, attr)
        self.edits: dict[str, list[tuple[ast.AST, str]]] = {}  # module -> (node, replacement text)
        self.externals: dict[tuple, str] = {}  # (module, attr) -> name bound in the bundle
        self.plain_imports: set[str] = set()  # "import torch", "import torch.nn as nn"
        self.from_imports: dict[str, set[str]] = {}  # module -> {"Path", "Callable as C"}
        self.module_order: list[str] = []

    # -- resolution ------------------------------------------------------------------------------

    def resolve(self, module_name: str, name: str, seen: tuple = ()) -> tuple[str, str]:
        """(module, name) of the definition that `name` in `module_name` finally refers to."""
        if (module_name, name) in STUBS:
            return module_name, name
        module = read_module(module_name, self.modules)
        if name in module.definitions:
            return module_name, name
        binding = module.imports.get(name)
        if binding is None or binding.kind != "internal" or (module_name, name) in seen:
            raise BundleError(f"cannot find {name!r} in {module_name}")
        return self.resolve(binding.module, binding.attr, (*seen, (module_name, name)))

    def claim(self, name: str, owner: tuple) -> bool:
        """Bind `name` in the bundle to `owner`; False when another owner holds it."""
        current = self.owner.setdefault(name, owner)
        return current == owner

    # -- inclusion -------------------------------------------------------------------------------

    def include(self, module_name: str, name: str) -> None:
        module_name, name = self.resolve(module_name, name)
        if (module_name, name) in STUBS:
            if name not in self.stubs:
                if not self.claim(name, ("def", module_name)):
                    raise BundleError(f"{name} of {module_name} clashes with {self.owner[name]}")
                self.stubs[name] = STUBS[module_name, name]
            return
        module = read_module(module_name, self.modules)
        stmt = module.definitions[name]
        statements = self.included.setdefault(module_name, [])
        if any(s is stmt for s in statements):
            return
        bound = [n for n, s in module.definitions.items() if s is stmt]
        for bound_name in bound:
            if not self.claim(bound_name, ("def", module_name)):
                raise BundleError(
                    f"{bound_name!r} is defined in both {module_name} and {self.owner[bound_name][1]}, which the "
                    "pipeline folder's code puts into one module: rename one of them"
                )
        statements.append(stmt)
        check_nested_imports(module, stmt)
        follow_annotations = module_name == ENTRY
        for use in uses(module, stmt):
            if use.in_annotation and not follow_annotations:
                self.edits.setdefault(module_name, []).append((use.node, None))  # renamed later if bundled
                continue
            self.use(module, use)

    def use(self, module: Module, use: Use) -> None:
        name = use.name
        if name in module.definitions:
            self.include(module.name, name)
            return
        binding = module.imports[name]
        if binding.kind == "internal":
            target_module, target = self.resolve(binding.module, binding.attr)
            if target != name:
                self.edits.setdefault(module.name, []).append((use.node, target))
            self.include(target_module, target)
        elif binding.kind == "module":  # `alias.attr` -> `attr`
            target_module, target = self.resolve(binding.module, use.node.attr)
            self.edits.setdefault(module.name, []).append((use.node, target))
            self.include(target_module, target)
        else:
            self.edits.setdefault(module.name, []).append((use.node, self.external(binding, name)))

    def external(self, binding: Binding, local: str) -> str:
        """The bundle-level name of a third-party object: its local name, or `module.attr` (with
        `import module`) when that name is taken by something else."""
        key = (binding.module, binding.attr)
        if key in self.externals:
            return self.externals[key]
        name = local
        if not self.claim(name, ("external", *key)):
            if binding.attr is None:
                raise BundleError(f"the module name {local!r} ({binding.module}) clashes with {self.owner[local]}")
            top = binding.module.split(".")[0]
            if not self.claim(top, ("external", top, None)):
                raise BundleError(f"cannot qualify {local!r} as {binding.module}.{binding.attr}: {top!r} is taken")
            self.plain_imports.add(f"import {binding.module}")
            name = f"{binding.module}.{binding.attr}"
        elif binding.attr is None:
            same = binding.module == name or binding.module.split(".")[0] == name and "." not in binding.module
            self.plain_imports.add(f"import {binding.module}" + ("" if same else f" as {name}"))
        else:
            self.from_imports.setdefault(binding.module, set()).add(
                binding.attr if binding.attr == name else f"{binding.attr} as {name}"
            )
        self.externals[key] = name
        return name

    # -- output ----------------------------------------------------------------------------------

    def order_modules(self) -> list[str]:
        """Modules whose definitions were copied, each after the package modules it imports from."""
        order: list[str] = []

        stubbed = {module for module, name in STUBS if name in self.stubs}

        def visit(name: str, stack: tuple = ()) -> None:
            if name in order or name in stack:
                return
            module = self.modules.get(name)
            for binding in module.imports.values() if module is not None else ():
                if binding.kind == "module":
                    visit(binding.module, (*stack, name))
                elif binding.kind == "internal":
                    try:
                        visit(self.resolve(binding.module, binding.attr)[0], (*stack, name))
                    except BundleError:  # an import the copied definitions do not use
                        pass
            if name in self.included or name in stubbed:
                order.append(name)

        for name in sorted(self.included, key=lambda n: n != ENTRY):
            visit(name)
        return order

    def statement_source(self, module: Module, stmt: ast.stmt) -> str:
        """The lines of `stmt` with its decorators and the comment lines right above it, edited."""
        lines = module.lines
        start = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
        while start > 1 and lines[start - 2].lstrip().startswith("#"):
            start -= 1
        end = stmt.end_lineno
        chunk = [line.encode() for line in lines[start - 1 : end]]
        edits = []
        for node, replacement in self.edits.get(module.name, []):
            if not (start <= node.lineno and node.end_lineno <= end):
                continue
            if replacement is None:  # an annotation name: renamed only when it means the same in the bundle
                replacement = self.annotation_name(module, node)
                if replacement is None:
                    continue
            edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, replacement))
        # Apply from the end so earlier offsets stay valid (ast offsets are in UTF-8 bytes).
        for line, col, end_line, end_col, text in sorted(edits, reverse=True):
            first, last = line - start, end_line - start
            chunk[first : last + 1] = [chunk[first][:col] + text.encode() + chunk[last][end_col:]]
        return "\n".join(line.decode() for line in chunk)

    def annotation_name(self, module: Module, node: ast.AST) -> str | None:
        name = node.value.id if isinstance(node, ast.Attribute) else node.id
        binding = module.imports.get(name)
        if binding is None:
            return None
        if binding.kind == "external":
            bundled = self.externals.get((binding.module, binding.attr))
            return bundled if bundled not in (None, name) else None
        try:
            target_module, target = self.resolve(
                binding.module, node.attr if binding.kind == "module" else binding.attr
            )
        except BundleError:
            return None
        included = target in self.stubs or any(
            s is read_module(target_module, self.modules).definitions.get(target)
            for s in self.included.get(target_module, [])
        )
        wanted = target if binding.kind == "module" or target != name else None
        return wanted if included else None

    def import_block(self) -> str:
        froms = [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(self.from_imports.items())]
        return "\n".join(sorted(self.plain_imports) + froms)


def collect() -> Bundle:
    bundle = Bundle()
    entry = read_module(ENTRY, bundle.modules)
    for name in entry.definitions:
        bundle.include(ENTRY, name)
    for name in (PIPELINE_CLASS, TRANSFORMER_CLASS):
        if name not in bundle.owner:
            raise BundleError(f"{ENTRY} does not reach {name}")
    return bundle


# ------------------------------------------------------------------------------------------------
# The generated module
# ------------------------------------------------------------------------------------------------


def generate_code() -> str:
    """The source of CODE_MODULE: a header naming the version and the modules it was generated from, the
    imports, each module's copied definitions in source order, and the re-execution guard."""
    from sit_atconv import __version__

    bundle = collect()
    order = bundle.order_modules()
    sections = []
    for name in order:
        module = bundle.modules.get(name)
        parts = []
        if module is not None and name in bundle.included:
            statements = sorted(bundle.included[name], key=lambda s: s.lineno)
            parts += [bundle.statement_source(module, s) for s in statements]
        parts += [bundle.stubs[n].strip("\n") for (m, n) in STUBS if m == name and n in bundle.stubs]
        relative = f"{name.replace('.', '/')}.py"
        sections.append(f"# {'-' * 96}\n# From {relative}\n# {'-' * 96}\n\n\n" + "\n\n\n".join(parts))
    described = "\n".join(f"    {name}{' (stubbed)' if name not in bundle.included else ''}" for name in order)
    header = (
        f'"""SiTPipeline and SiT for diffusers, generated from sit-atconv {__version__} (do not edit: re-export).\n\n'
        "    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)\n\n"
        "The definitions below are copied from these modules of the package, with the package's imports\n"
        "removed, so the folder loads and samples without sit-atconv installed:\n\n"
        f"{described}\n\n"
        "The fused Triton kernels of ATConv are not included (conv_impl='triton' raises); every other\n"
        "conv_impl computes the same function. Needs torch, diffusers, einops and timm (torchdiffeq for the\n"
        '"dopri5" sampler).\n"""\n\n'
        "from __future__ import annotations\n\n"
    )
    body = bundle.import_block() + "\n\n\n" + "\n\n\n".join(sections) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    guard = REEXECUTION_GUARD.format(digest=digest)
    code = header + guard + "\n" + body + "\n\n" + REEXECUTION_RESTORE
    ast.parse(code)  # a generation bug must fail here, at export, not at the user's load
    return code


def write_remote_code(folder: str | Path, code: str | None = None) -> None:
    """Ship the generated module in pipeline folder `folder` (as written by `SiTPipeline.save_pretrained`):
    `<folder>/CODE_MODULE.py` and `transformer/CODE_MODULE.py`, and point model_index.json's
    `_class_name` and `transformer` entries at them."""
    folder = Path(folder)
    code = generate_code() if code is None else code
    for target in (folder / f"{CODE_MODULE}.py", folder / "transformer" / f"{CODE_MODULE}.py"):
        target.write_text(code)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [CODE_MODULE, PIPELINE_CLASS]
    index["transformer"] = [CODE_MODULE, TRANSFORMER_CLASS]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_remote_code_entry(entry) -> bool:
    """Whether a model_index.json entry names the shipped module (["pipeline_sit_atconv", class])."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == CODE_MODULE
