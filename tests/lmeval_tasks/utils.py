"""process_docs of the hellaswag-style task: as hellaswag's own, a context in two parts
and endings, rewritten into a query, choices and the gold index."""


def _doc(doc: dict) -> dict:
    return {"query": (doc["ctx_a"] + " " + doc["ctx_b"]).strip(), "choices": list(doc["endings"]),
            "gold": int(doc["label"])}


def process_docs(dataset):
    return dataset.map(_doc)
