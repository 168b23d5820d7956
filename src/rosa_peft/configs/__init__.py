"""Recipe configs shipped in the wheel: ``rosa train --config NAME.yaml`` / ``rosa study NAME.yaml`` find
them by file name when no such file exists locally. The repository's ``configs/`` links here."""
