#!/bin/sh
# How meeting-31s.flac and meeting-55s.flac were made (espeak-ng 1.51, sox 14.4): our own text, 16 kHz mono,
# pauses of 1.5-3 s (the long-form loop meets silence), 0.5 s of digital silence at the end and a length that is a
# multiple of 160 samples (so HF's batched features equal each recording's own: see tests/runtime/test_longform.py).
set -e
say() { espeak-ng -v en-us -s "$1" -w "$2.raw.wav" "$3" && sox "$2.raw.wav" -r 16000 -c 1 -b 16 "$2.wav" && rm "$2.raw.wav"; }
say 160 a1 "The committee met on Tuesday to discuss the new library. Maria Lopez said the building would open in the spring, and that the children's room would have three thousand new books."
say 160 a2 "After a short break, the treasurer read the budget. The roof repair will cost forty two thousand dollars, which is more than expected, but the city has agreed to pay half of it."
say 160 a3 "Several neighbors asked about parking. Mister Chen suggested a small lot behind the post office, and everyone agreed to look at the plan again next month before the final vote."
say 150 a4 "Finally, the students from the high school played two songs on the piano, and the meeting ended a little after eight in the evening."
sox a3.wav a2.wav -p pad 0 1.5 | sox - a4.wav m31.wav
sox a1.wav -p pad 0 2 | sox - a2.wav -p | sox - a3.wav -p pad 0 3 | sox - a4.wav a1.wav m55.wav
for m in m31 m55; do
  samples=$(soxi -s $m.wav)
  pad=$(( 8000 + (160 - (samples + 8000) % 160) % 160 ))
  sox $m.wav "$m.flac" pad 0 "${pad}s"
done
mv m31.flac meeting-31s.flac && mv m55.flac meeting-55s.flac && rm a1.wav a2.wav a3.wav a4.wav m31.wav m55.wav
