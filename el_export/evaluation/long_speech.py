"""W7's long recordings: paragraphs of our own English prose spoken by espeak-ng, with pauses between them; a
transcript's word error rate against the text they were spoken from is agreement.word_error_rate's.

Long-form transcription moves a 30 s window by the timestamps the model emits, so a recording must run for
minutes and hold silences where a window can end. Each recording here is a few paragraphs (numbers, names,
ordinary sentences), spoken one by one and joined by 1-3 s of digital silence. They are made once and reused, cached
by the sha256 of the paragraphs and pauses as speech_clips caches W5's clips.
"""

import tempfile
from pathlib import Path

import numpy as np

from el_export.evaluation.speech_clips import SAMPLING_RATE, build_cached, speak, write_wav

HOP = 160  # samples per log-mel frame at 16 kHz
TAIL_S = 0.5  # the least digital silence a recording ends with


# Each recording: its paragraphs and the pause (s) after each but the last. American spelling and Whisper's own
# habits (digits for large numbers, "Dr.") keep the word error rate about recognition, not orthography.
RECORDINGS = (
    {
        "paragraphs": [
            (
                "The town of Millbrook sits at a bend in a slow brown river, about 40 miles north of the coast. For "
                "most of the last century its main street held a hardware store, two churches, a post office and a "
                "small bakery run by the Okafor family. Grace Okafor opened the bakery in 1968 with a borrowed oven "
                "and a notebook of recipes that her grandmother had carried from Lagos. On the first morning she "
                "baked 90 loaves, and by noon every one of them was gone."
            ),
            (
                "Her son Daniel took over the shop in 1994. He kept the old recipes but changed almost everything "
                "else. He replaced the oven, painted the front door a bright shade of green, and started opening at "
                "five in the morning so that the workers from the paper mill could buy bread on their way to the "
                "early shift. Within a few years the bakery was selling more than 1,200 rolls a week, and people "
                "drove in from the farms across the valley just for his cinnamon buns."
            ),
            (
                "The paper mill closed in 2009, and many families left Millbrook to look for work in the cities. "
                "Daniel worried that the bakery would close as well. Instead, he began to teach. Every Saturday he "
                "invited a dozen children into the kitchen and showed them how to weigh flour, fold dough and wait "
                "patiently while it rose. Some of those children still come back to visit, and one of them, a young "
                "woman called Priya Shah, now runs a bakery of her own in Toronto."
            ),
            (
                "Today the green door is still there. The shop is quieter than it used to be, but on cold mornings "
                "there is usually a short line outside before the lights come on. Daniel says the secret has never "
                "been the recipes. It is simply that people like to know that someone in town gets up before dawn to "
                "make something warm for them."
            ),
        ],
        "pauses": [1.5, 2.5, 1.0],
    },
    {
        "paragraphs": [
            (
                "Last fall my friend Tomas and I decided to cross the mountains by train instead of flying. The "
                "journey took three days and covered roughly 2,400 kilometers. We left from the central station at a "
                "quarter past seven on a Tuesday morning, carrying two backpacks, a paper map and far too many "
                "sandwiches. The first car was full of students going home for the holidays, and one of them spent an"
                " hour teaching us a card game that none of us ever fully understood."
            ),
            (
                "On the second day the line climbed steadily through forests of pine and birch. Near the border the "
                "train stopped for almost 50 minutes while the crew changed the engine. We used the time to walk "
                "along the platform and buy hot tea from an old man with a cart. He told us that he had sold tea at "
                "that station since 1987, and that in all those years the train had never once arrived on time."
            ),
            (
                "The highest point of the route is a tunnel more than 15 kilometers long. It was finished in 1921 "
                "after eleven years of work, and a small stone plaque at the entrance lists the names of the 63 "
                "workers who died while building it. Tomas read every name aloud as we passed. When we came out the "
                "other side the weather had changed completely, and the valley below us was covered in fresh snow."
            ),
            (
                "We reached the coast late on the third evening, tired and a little sad that the trip was over. "
                "Flying would have taken four hours. The train took almost 60, and neither of us would trade a single"
                " one of them. Next year we plan to make the same journey in the other direction, and this time we "
                "will bring fewer sandwiches."
            ),
            (
                "On the way home we talked about the people we had met: the students with their card game, the tea "
                "seller at the border, and a retired nurse named Margaret who had ridden the same line every summer "
                "since 1975. She showed us photographs of the old carriages and told us which seats had the best view"
                " of the lakes."
            ),
        ],
        "pauses": [3.0, 1.0, 2.0, 2.5],
    },
    {
        "paragraphs": [
            (
                "In the spring of 2015, a retired teacher named Helen Brooks put a small weather station on the roof "
                "of the public library in Port Alder. She wanted her grandchildren to understand where the numbers on"
                " the evening forecast came from. The station measured temperature, wind, rain and air pressure every"
                " ten minutes and sent the readings to a laptop in the reading room, where anyone could see them."
            ),
            (
                "Within a year, 35 volunteers had joined her. They built 12 more stations and placed them on farms, "
                "schools and fishing boats along the coast. The students at Harbor Road School wrote a program that "
                "drew the readings as a map, and the local radio station began to read the figures out every Sunday "
                "morning. By 2019 the network had collected more than four million measurements."
            ),
            (
                "The data turned out to be useful in ways nobody had planned. In 2020 a storm flooded the lower part "
                "of the town, and engineers from the regional council used the rainfall records of the volunteers to "
                "redesign the drains along Water Street. A researcher from the university in Halifax, Dr. Samuel "
                "Reyes, later published a study showing that the harbor warms almost twice as fast as the hills only "
                "20 kilometers inland."
            ),
            (
                "Helen Brooks still climbs onto the library roof once a month to clean the rain gauge. She is 81 now "
                "and says she has no plans to stop. When visitors ask her why she started, she gives the same answer "
                "every time. She did not want to predict the weather. She only wanted people to look up at the sky "
                "and ask a good question."
            ),
            (
                "Last year the library asked Helen to write down how the project began, so that others could copy it."
                " Her guide runs to 48 pages and has already been used by groups in Maine, in Oregon and on two "
                "islands off the coast of Scotland. Each of them started, as she did, with one station on one roof."
            ),
        ],
        "pauses": [2.0, 1.5, 3.0, 1.0],
    },
)
# The quick profile's one recording: past 30 s, so the long-form loop moves its window at least once.
QUICK = (
    {
        "paragraphs": [
            (
                "On Monday morning, Clara Jensen opened her shop on River Lane as usual. She sold 14 umbrellas before"
                " lunch, because the rain had not stopped for three days and nobody in the village owned a dry coat "
                "any more."
            ),
            (
                "In the afternoon the sun came out at last. Clara closed the shop early, walked down to the harbor "
                "with her dog, and counted 27 boats coming home with the tide."
            ),
            (
                "That evening she wrote in her diary that it had been the best day of the year, and then she went to "
                "bed before ten."
            ),
        ],
        "pauses": [2.0, 1.5],
    },
)


def build_recordings(directory: Path, recordings: tuple[dict, ...] = RECORDINGS) -> list[Path]:
    """One WAV per recording in `directory` (00.wav, ...), made only where missing, changed, or made from other text.

    Raises:
        InputError: espeak-ng is not installed or fails.
    """
    return build_cached(directory, recordings, _write_recording)


def recording_text(recording: dict) -> str:
    return " ".join(recording["paragraphs"])


def _write_recording(recording: dict, path: Path) -> None:
    """Each paragraph spoken, the pauses between them, then at least TAIL_S of silence, to a whole number of hops.

    A sample count that is a multiple of HOP gives a whole number of log-mel frames, and the silent tail makes zero
    padding look like the recording's own end (the STFT windows at the end read silence either way): so the
    features HF's feature extractor computes for a padded batch (padding="longest") equal each recording's own.
    """
    parts = []
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".speak-") as scratch:
        for paragraph, pause in zip(recording["paragraphs"], [*recording["pauses"], 0.0], strict=True):
            parts += [speak(paragraph, Path(scratch)), np.zeros(round(pause * SAMPLING_RATE), dtype=np.float32)]
    samples = sum(part.size for part in parts) + round(TAIL_S * SAMPLING_RATE)
    parts.append(np.zeros(round(TAIL_S * SAMPLING_RATE) + (-samples) % HOP, dtype=np.float32))
    write_wav(np.concatenate(parts), path)
