from onnxpipe.cli import main

main()
