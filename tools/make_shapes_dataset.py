"""Write the generated shapes dataset (COCO format) used for accuracy parity and the demo.

    python tools/make_shapes_dataset.py --output_dir dataset/shapes --images 300 --split train
"""
import os
import sys
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--output_dir", default="dataset/shapes")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ppfuse.measure.shapes import write_split
    path = write_split(args.output_dir, args.split, args.images, args.seed, args.size)
    print(f"wrote {args.images} images to {os.path.join(args.output_dir, args.split)}/ and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
