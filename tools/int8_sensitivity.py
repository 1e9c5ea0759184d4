"""Which modules an int8 recipe should keep in float32: each candidate kept float32 in turn, measured on Whisper.

The README's int8 recipe was chosen with this: a float32 Whisper bundle (tokens equal to HF's) is quantized with the
base recipe and with each candidate module group left float32, and every variant transcribes clips of sentences
written for this purpose (not W3's shipped clips nor W5's, on which the goals are measured), spoken by espeak-ng.
It prints, per variant, the transcripts equal to the float32 bundle's (beam search and greedy) and the seconds.

    .venv/bin/python tools/int8_sensitivity.py graphs/bench/whisper-el --work graphs/int8-sensitivity
"""

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import el_export
from el_export.contract.files import file_entries, read_manifest, write_manifest
from el_export.contract.quantization import DEFAULT, Keep, Recipe
from el_export.evaluation.speech_clips import build_clips
from el_export.export import quantize

TUNING = (
    "Hello there.",
    "Bring your umbrella today.",
    "The parcel arrived late on Tuesday.",
    "Olivia booked two seats for the concert in March.",
    "Could you send me the slides before the call starts?",
    "The ferry to the island runs every forty minutes until 11:30 at night.",
    "Our new office is on the third floor, next to the dentist and the small bakery.",
    "Professor Nakamura told the class that the exam would cover chapters five through nine.",
    "The museum received 3,400 visitors on Sunday, a record for the month of October.",
    "After the power cut, the whole building was dark for an hour, and the lifts stopped between floors.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt, mixed until smooth.",
    "Kevin usually runs along the canal in the morning, then takes the bus to work at half past eight.",
    "When the referee blew the final whistle, the crowd rushed onto the pitch to celebrate with the players.",
    "The council voted to plant five hundred trees along the ring road, starting in the north of the city.",
    "Maria fixed the leaking tap in the kitchen, painted the back door green, and still had time to call her mother.",
    "Every summer the village holds a fair with music, games for the children, and a competition for the best apple "
    "pie.",
    "Yes, of course.",
    "Wait for me at the corner.",
    "The printer on the second floor is out of paper.",
    "Sam and Priya finished the puzzle just after midnight.",
    "Remember to water the plants while I am away next week.",
    "The flight from Dublin was delayed by two hours because of fog.",
    "I left my keys on the table by the window, next to the blue lamp.",
    "The children built a snowman in the garden and gave it a red scarf.",
    "Our team scored twice in the last ten minutes and won the cup.",
    "The doctor asked him to rest for a week and to drink plenty of water.",
    "She opened the letter slowly, read it twice, and then began to laugh.",
    "The old clock in the hall stopped at a quarter past four and nobody fixed it.",
    "Tickets for the school play cost five pounds for adults and two for children.",
    "He spent the whole afternoon repairing the fence that the storm had knocked down.",
    "The bakery on the corner sells fresh bread every morning from seven o'clock.",
    "If you take the second road on the right, you will see the station straight ahead.",
    "The hikers reached the top of the mountain just as the clouds began to clear.",
    "My grandfather grew up on a farm with three horses, a dozen cows and far too many chickens.",
    "The company plans to open two new shops in Glasgow and one in Leeds before the end of the year.",
    "When the music started, everyone in the room stood up and began to dance, even the waiters.",
    "Please read the instructions carefully before you switch the machine on for the first time.",
    "The river was so high after the rain that the footpath along the bank was closed for days.",
    "Lucy wrote a long email to her manager explaining why the project needed another month.",
    "At the end of the street there is a small park with a pond, a playground and a cafe.",
)
# Whisper's modules, in groups: kept float32 one group at a time on top of the base recipe.
CANDIDATES = {
    "lm_head": ["model.lm_head"],
    "decoder fc1": ["model.decoder.layers.*.fc1"],
    "decoder fc2": ["model.decoder.layers.*.fc2"],
    "decoder self-attention": ["model.decoder.layers.*.self_attn.*"],
    "decoder cross-attention": ["model.decoder.layers.*.encoder_attn.*"],
    "decoder first layer": ["model.decoder.layers.0.*"],
    "decoder last layer": ["model.decoder.layers.3.*"],
    "encoder fc1": ["model.encoder.layers.*.fc1"],
    "encoder fc2": ["model.encoder.layers.*.fc2"],
    "encoder attention": ["model.encoder.layers.*.self_attn.*"],
    "encoder first layer": ["model.encoder.layers.0.*"],
    "encoder last layer": ["model.encoder.layers.3.*"],
}


def variant(source: Path, out: Path, recipe: Recipe) -> Path:
    """`source` (a float32 bundle) with its graphs quantized by `recipe`, as export writes it."""
    if (out / "manifest.json").is_file() and read_manifest(out, hash_files=False).quantization.get("recipe") == \
            recipe.to_json():  # fmt: skip
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    manifest = read_manifest(source)
    graphs = {name: quantize.quantize_file(partial / entry.file, name, recipe, el=manifest.mode == "el")
              for name, entry in manifest.graphs.items()}  # fmt: skip
    entries = {name: quantize.quantized_entry(e, graphs[name]) for name, e in manifest.graphs.items()}
    write_manifest(partial, replace(manifest, graphs=entries, files=file_entries(partial),
                                    quantization=quantize.record(recipe, graphs)))  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def transcripts(bundle: Path, audio: list, beams: int, threads: int) -> tuple[list, float]:
    generator = el_export.load(bundle, threads=threads)
    eos = generator.manifest.special_tokens["eos_token_id"]
    start = time.perf_counter()
    rows = generator.generate(audio=audio, num_beams=beams).sequences.tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows], time.perf_counter() - start


def main() -> None:
    import soundfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a float32 Whisper bundle (el mode)")
    parser.add_argument("--work", type=Path, default=Path("graphs/int8-sensitivity"), help="clips and variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", type=int, default=5)
    args = parser.parse_args()
    clips = build_clips(args.work / "clips", TUNING)
    audio = [soundfile.read(str(c), dtype="float32")[0] for c in clips]
    recipes = {"base (default)": DEFAULT}
    for label, patterns in CANDIDATES.items():
        keeps = tuple(Keep(p, "sensitivity sweep") for p in patterns)
        recipes[f"+ float32 {label}"] = replace(DEFAULT, name=f"sweep-{label}", float32=DEFAULT.float32 + keeps)
    reference = {beams: transcripts(args.bundle, audio, beams, args.threads)[0] for beams in (args.beams, 1)}
    print(f"| variant | same as float32, {args.beams} beams | same, greedy | seconds ({args.beams} beams) |")
    print("|---|---|---|---|")
    results = {}
    for label, recipe in recipes.items():
        bundle = variant(args.bundle, args.work / recipe.name.replace(" ", "-"), recipe)
        row = {}
        for beams in (args.beams, 1):
            got, seconds = transcripts(bundle, audio, beams, args.threads)
            row[beams] = (sum(a == b for a, b in zip(got, reference[beams], strict=True)), seconds)
        results[label] = {"beams": row[args.beams][0], "greedy": row[1][0], "seconds": row[args.beams][1]}
        print(f"| {label} | {row[args.beams][0]}/{len(audio)} | {row[1][0]}/{len(audio)} | {row[args.beams][1]:.2f} |",
              flush=True)  # fmt: skip
    (args.work / "sensitivity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
