"""What the platform offers: the tools and their families (``tools``, ``families``), tool
packages brought by users (``byo``), the image maths every tool shares (``imaging``,
``volumes``, ``postprocess``), the regions (``regions``), the per-region tool choice
(``tool_config``) and the version admission records (``version_admission``).

May import jobs (admission decisions and tool choice live in the object store).
"""
