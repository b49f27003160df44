"""tests/mutants_native.py: a mutmut diff lands in the function it names, nowhere else."""

from mutants_native import mutated

SOURCE = "def f(x):\n    return x >= 0\n\n\ndef g(x):\n    return x >= 0\n"
DIFF = """# m.x_g__mutmut_1: survived
--- m.py
+++ m.py
@@ -1,2 +1,2 @@
 def g(x):
-    return x >= 0
+    return x > 0
"""


def test_the_diff_applies_inside_its_function_only():
    assert mutated(SOURCE, DIFF, "g") == "def f(x):\n    return x >= 0\n\n\ndef g(x):\n    return x > 0\n"
    assert mutated(SOURCE, DIFF.replace("x >= 0", "y >= 0"), "g") is None  # no such lines
