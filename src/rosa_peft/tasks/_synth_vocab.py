"""Vocabulary of the built-in ``sql-synth`` task: tables, their columns and value pools.

A column is ``(name, pool)`` where ``pool`` is either the name of a text pool (VARCHAR column)
or an inclusive ``(low, high)`` integer range (INTEGER column). No value contains a quote.
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

Pool = Union[str, Tuple[int, int]]

TEXT_POOLS: Dict[str, List[str]] = {
    "person": ["John Smith", "Maria Lopez", "Wei Chen", "Anna Novak", "David Brown", "Sara Ali",
               "Tom Baker", "Lena Fischer", "Omar Haddad", "Kate Wilson", "Ivan Petrov", "Nina Costa"],
    "team": ["Eagles", "Tigers", "Sharks", "Wolves", "Lions", "Hawks", "Bears", "Falcons",
             "Rangers", "Comets"],
    "city": ["Boston", "Denver", "Lyon", "Osaka", "Madrid", "Dublin", "Austin", "Porto", "Munich",
             "Seattle", "Milan", "Quebec"],
    "country": ["France", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Chile", "India", "Italy",
                "Mexico", "Spain", "Egypt"],
    "position": ["Forward", "Defender", "Goalkeeper", "Midfielder", "Guard", "Center"],
    "genre": ["Rock", "Jazz", "Pop", "Drama", "Comedy", "Horror", "Folk", "Blues"],
    "work": ["Blue Sky", "Night Train", "Silver Moon", "Open Road", "Red River", "Last Dance",
             "Cold Fire", "Golden Hour", "Paper Town", "Wild Heart"],
    "company": ["Apex", "Northstar", "Bluebird", "Summit", "Riverside", "Orion"],
    "department": ["Sales", "Finance", "Research", "Legal", "Marketing", "Support"],
    "job": ["Manager", "Engineer", "Analyst", "Designer", "Clerk", "Director"],
    "venue": ["Central Park", "River Arena", "Hill Stadium", "Lake Field", "Union Hall", "Bay Center"],
    "result": ["Win", "Loss", "Draw"],
    "maker": ["Ford", "Toyota", "Honda", "Volvo", "Fiat", "Kia"],
    "fuel": ["Petrol", "Diesel", "Electric", "Hybrid"],
    "model": ["Aurora", "Vector", "Falcon", "Nomad", "Pulse", "Zenith", "Breeze", "Titan"],
    "school": ["Oak Ridge High", "Lincoln Academy", "Maple College", "Westview School",
               "Harbor Institute", "Pine Valley High"],
    "conference": ["North", "South", "East", "West", "Central"],
}

TABLES: Dict[str, List[Tuple[str, Pool]]] = {
    "players": [("name", "person"), ("team", "team"), ("position", "position"),
                ("country", "country"), ("age", (18, 39)), ("goals", (0, 40))],
    "matches": [("home_team", "team"), ("away_team", "team"), ("venue", "venue"),
                ("result", "result"), ("attendance", (1000, 90000)), ("round", (1, 20))],
    "songs": [("title", "work"), ("artist", "person"), ("genre", "genre"), ("label", "company"),
              ("year", (1960, 2023)), ("rank", (1, 100))],
    "movies": [("title", "work"), ("director", "person"), ("genre", "genre"), ("studio", "company"),
               ("year", (1950, 2023)), ("budget", (1, 300))],
    "cities": [("city", "city"), ("country", "country"), ("mayor", "person"),
               ("population", (10000, 9000000)), ("area", (10, 3000))],
    "employees": [("name", "person"), ("department", "department"), ("job", "job"), ("city", "city"),
                  ("salary", (30000, 200000)), ("age", (20, 65))],
    "schools": [("school", "school"), ("city", "city"), ("conference", "conference"),
                ("enrollment", (200, 40000)), ("founded", (1800, 2010))],
    "cars": [("model", "model"), ("maker", "maker"), ("fuel", "fuel"), ("country", "country"),
             ("year", (1990, 2024)), ("price", (10000, 90000))],
}


def is_numeric(pool: Pool) -> bool:
    return isinstance(pool, tuple)


def sql_type(pool: Pool) -> str:
    return "INTEGER" if is_numeric(pool) else "VARCHAR"


def words(column: str) -> str:
    """How a column is named in the English question: ``home_team`` -> ``home team``."""
    return column.replace("_", " ")
