"""`python -m lmssl.convert`: kept at this path for the command line; the CLI lives in
lmssl.hf.convert."""

from lmssl.hf import convert

if __name__ == "__main__":
  convert.main()
