"""Small library helpers with no RoSA knowledge: argument checks (:mod:`rosa_peft.utils.checks`), matplotlib and
PNG writes (:mod:`rosa_peft.utils.plots`)."""
