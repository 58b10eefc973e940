"""Task functions of the local test tasks (loaded by lmms-eval from the task's directory)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}\nanswer using a single word ."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
